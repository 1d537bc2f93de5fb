# Shared by scripts/demo.sh and scripts/demo_ablations.sh (sourced): where the demo's data and runs go, and how
# its data, tokenizer and base models are made. Everything is generated here; nothing is downloaded.
export TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
DATA=${DEMO_DATA:-data/demo}
OUT=${DEMO_OUT:-checkpoints/demo}
SIZES=${DEMO_SIZES:---n-stage1 3000 --n-stage2 6000 --n-eval 300}
PROSE=${DEMO_PROSE:-20000}
# Stage-2 samples: 2-5 rounds, image always before the first question (as at evaluation), fewer
# long descriptions (they would dominate the token-averaged loss), more yes/no existence questions; and 1,500 more
# on one-shape images, the first pass of Stage 2 (scripts/demo.sh).
SHAPES_ARGS="--min-rounds 2 --max-rounds 5 --image-first 1 --type-weights ${DEMO_TYPE_WEIGHTS:-color=1,shape=1,count=1,position=1,exists=1.5,describe=0.5} --n-stage2-warmup ${DEMO_WARMUP:-1500}"

# demo_data [make_shapes flags]: images, captions, instructions, eval questions, prose; then the tokenizer
demo_data() {
  python -m data_prep.make_shapes --out "$DATA" --seed 0 --image-size 48 $SHAPES_ARGS $SIZES --n-prose "$PROSE" "$@"
  python -m data_prep.make_tokenizer --corpus "$DATA/corpus.txt" --out "$DATA/tokenizer" --vocab-size 600
}

# demo_base: an LLM pretrained on the prose and a CLIP-style tower on the Stage-1 image-caption pairs, in
# $OUT/base (reused while the inputs and settings are unchanged)
demo_base() {
  python -m data_prep.pretrain_base --data "$DATA" --tokenizer "$DATA/tokenizer" --out "$OUT/base" ${DEMO_BASE_ARGS:-}
}

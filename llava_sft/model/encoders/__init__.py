"""Vision encoders, one small file each, registered in `llava_sft.model.vision.ENCODERS`."""

"""Making a model bundle: the MVTec-layout dataset, teacher distillation, student training,
calibration, metrics and evaluation, and their command-line commands."""

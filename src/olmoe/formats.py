"""Names of the weight formats olmoe converts to, importable without torch (for `olmoe --help`)."""

QUANTIZE_CHOICES = ("int8", "int4")

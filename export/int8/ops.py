"""The fixed facts of int8 graphs (not tuning choices, which are the recipe's)."""

# The bits of int8 weights when the export names none (Graph.weight_bits): 7 runs exact on the
# fast kernels of every x86 CPU, 8 needs slower exact kernels where there is no VNNI or AMX.
DEFAULT_WEIGHT_BITS = 7

# The largest magnitude of int8 weights of each span: onnxruntime's quantizer's symmetric
# ranges (reduce_range for 7 bits), which the refit keeps.
WEIGHT_LIMIT = {7: 64, 8: 127}

# Calibration needs images to fit on, one to check the fits on, and one held out for parity.
MIN_CALIBRATION_IMAGES = 3

# Calibration images are centre crops of this side: photos' statistics at their own
# resolution (a downscale would change them), at a size whose saved activations fit memory.
CALIBRATION_SIDE = 256

# The sweep's candidates: the ops that carry the int8 weights and most of the work.
SWEPT_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")

# The ops that end a decoder's lowest-resolution stage (Int8Recipe.wide_flop_share).
UPSAMPLING_OPS = ("Resize", "Upsample", "ConvTranspose", "DepthToSpace")

# Nodes that compute no activations: constants and shape arithmetic.
CONSTANT_OPS = ("Constant", "Shape")

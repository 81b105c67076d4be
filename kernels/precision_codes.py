"""The Triton kernels' codes for a job's matmul precision: plain Python, importable where
Triton is not installed (a CPU server checks its --float32-matmul with them at start-up)."""

# Matmul operand precision: IEEE fp32, TF32, bf16 or fp16 operands; fp32 accumulation always.
PRECISION_CODES = {"float32": 0, "tf32": 1, "bfloat16": 2, "float16": 3}
# float32 to fp32 accuracy on tensor cores: three tf32 products per matmul (split_tf32)
# instead of IEEE FMAs; triton_engine.run(..., float32_matmul="tf32x3") selects it.
TF32X3 = 4

"""File-format constants shared by modules that must not import llama_cpp (the store) and the engine."""

# Quantization types `--quant` offers, by llama.cpp's file-type enum (llama.h LLAMA_FTYPE_*, also
# gguf.LlamaFileType); the same number is stored in a GGUF's general.file_type.
QUANT_FTYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9,
                "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18, "bf16": 32}

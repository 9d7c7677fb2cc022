"""Runs llama.cpp's convert_hf_to_gguf.py on an exported folder: `python llama_cpp_convert.py LLAMA_CPP_DIR MODEL_DIR
OUT.gguf`.

llama.cpp names a BPE vocabulary's pre-tokenizer by hashing the token ids of a test string, and knows only the hashes
of published models; the tests' tokenizer is trained here (byte-level BPE with GPT-2's pre-tokenizer and regex), so
its pre-tokenizer is named "gpt-2" directly. Nothing else of the conversion is changed."""

from __future__ import annotations

import runpy
import sys

if __name__ == "__main__":
    source, model_dir, outfile = sys.argv[1:4]
    sys.path[:0] = [source, f"{source}/gguf-py"]
    from conversion.base import TextModel

    TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outfile", outfile, "--outtype", "f32"]
    runpy.run_path(f"{source}/convert_hf_to_gguf.py", run_name="__main__")

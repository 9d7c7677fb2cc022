"""Loads exported models the way a user without hf_condroute does, and records what they compute.

Run as `python export_native_probe.py MANIFEST`: for each case of the manifest (a JSON list of {"dir", "kind",
"inputs"}) it loads the folder with AutoModelForCausalLM / AutoModelForSeq2SeqLM (kind "causal" / "seq2seq"), or the
base model plus an ordinary PEFT LoRA adapter (kind "lora"), and saves logits, router logits and greedy tokens to
<dir>/probe.pt. It never imports hf_condroute, and fails if anything did."""

from __future__ import annotations

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM


def probe(case: dict) -> dict:
    inputs = torch.load(case["inputs"])
    out = {}
    if case["kind"] == "lora":
        from peft import PeftModel

        for i, folder in enumerate(case["adapters"]):
            base = AutoModelForCausalLM.from_pretrained(case["base"], dtype=torch.float32)
            model = PeftModel.from_pretrained(base, folder).eval()
            with torch.no_grad():
                out[f"logits_{i}"] = model(input_ids=inputs["input_ids"]).logits
        return out
    auto = AutoModelForSeq2SeqLM if case["kind"] == "seq2seq" else AutoModelForCausalLM
    model = auto.from_pretrained(case["dir"], dtype="auto").eval()
    out["class"] = type(model).__name__
    out["dtype"] = str(model.dtype)
    with torch.no_grad():
        result = model(**inputs["forward"], output_router_logits=True)
        out["logits"] = result.logits.float()
        if case["kind"] == "seq2seq":
            out["router_logits"] = [
                t[0] if isinstance(t, tuple) else t
                for t in (*result.encoder_router_logits, *result.decoder_router_logits)
                if t is not None and (not isinstance(t, tuple) or t[0] is not None)
            ]
        else:
            out["router_logits"] = list(result.router_logits)
        out["generated"] = model.generate(**inputs["generate"], do_sample=False, max_new_tokens=8)
    return out


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    for case in cases:
        torch.save(probe(case), os.path.join(case["dir"], "probe.pt"))
    leaked = sorted(m for m in sys.modules if m.split(".")[0] == "hf_condroute")
    assert not leaked, f"the probe imported {leaked}"
    print("ok", len(cases))

"""Routed LoRA against LoRA and X-LoRA on a real pretrained causal LM (SmolLM2-135M) and real text (IMDB and Rotten
Tomatoes movie reviews, the source as the tag), see recipes/real_text.py."""

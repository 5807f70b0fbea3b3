"""LoRA adapters: reading PEFT adapter configs, applying adapters while streaming, merging them in
adapter space and extracting them from fine-tunes."""

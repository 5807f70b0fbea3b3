"""Reading and writing models: references, safetensors readers and writers, outputs, locks, cards, the Hub."""

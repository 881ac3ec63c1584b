"""Text: the language-model training step, `raycraft generate` and `raycraft tokenizer`."""

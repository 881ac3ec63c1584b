"""Text: tokenizers (characters, byte-pair encoding), corpora, and the language-model training step."""

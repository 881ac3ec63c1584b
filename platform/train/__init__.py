"""The one training loop for every supervised and generative model, run by Ray Train."""

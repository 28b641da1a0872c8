"""Training the tiny models: the corpus, the losses (load balancing, z-loss), the loop, the instruct fine-tune."""

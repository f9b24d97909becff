"""Quality measurement: perplexity and logit comparison."""

"""Training recipe of the reference model: sim keyframes -> labelled examples -> block-diffusion objective.

``data`` (and ``labels``) turn synthetic scenes into tokenized examples, ``objective`` holds the
Fast-dLLM v2-style block-diffusion loss, ``trainer`` runs it and writes the checkpoint.
"""

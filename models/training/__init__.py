"""DMAE training: pre-training (denoising masked autoencoding) and consistency fine-tuning.

``schedule`` holds the optimiser recipe (parameter groups, warm-up + cosine), ``consistency``
the fine-tuning loss, ``state`` the resumable run state, ``datasets`` the training inputs,
``loop`` the shared training loop, and ``pretrain`` / ``finetune`` the two stages.
"""

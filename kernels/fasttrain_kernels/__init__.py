"""fasttrain's kernels: Triton kernels and their pure-PyTorch references.

Installed under the import name ``fasttrain_kernels`` (source lives in the repository's ``kernels/``
folder) so that Hugging Face's ``kernels`` distribution is never shadowed.
"""

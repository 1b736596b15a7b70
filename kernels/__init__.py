"""Triton kernels for the PPO engine: one file per op, no engine imports.

Each op dispatches by device (see kernels/dispatch.py): CUDA tensors run the Triton kernel, CPU
tensors run it in Triton's interpreter when TRITON_INTERPRET=1 was set before triton was imported,
and otherwise fall back to the plain-PyTorch oracle in kernels/reference.py.
"""

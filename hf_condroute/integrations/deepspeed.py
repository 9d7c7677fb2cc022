"""DeepSpeed on CPU processes: starting without the 3-minute build of DeepSpeed's shared-memory collective op.

`deepspeed.init_distributed` (which the Trainer and accelerate call for a DeepSpeed config) JIT-compiles the
`deepspeed_shm_comm` op on DeepSpeed's CPU accelerator (about 3 minutes on 2 cores, then cached under
~/.cache/torch_extensions). A run killed during that build leaves the build's `lock` file there, and the next run
waits on it forever. DeepSpeed (0.19) has no setting to leave the op out, but it builds the op only when its table
of compatible ops, `deepspeed.ops.__compatible_ops__`, says it can (`deepspeed.comm.torch.build_shm_op`); without
it, collectives go through torch.distributed (gloo on CPU), the same results.
"""

from __future__ import annotations

SHM_COMM_OP = "deepspeed_shm_comm"


def skip_cpu_shm_comm_build() -> None:
    """Let DeepSpeed's CPU accelerator communicate through torch.distributed (gloo) instead of building its
    shared-memory op; call it before `deepspeed.init_distributed`, the Trainer or `accelerate` set DeepSpeed up.
    GPU accelerators never build that op, so this changes nothing there."""
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if not isinstance(compatible, dict) or SHM_COMM_OP not in compatible:
        raise RuntimeError(
            f"This DeepSpeed ({deepspeed.__version__}) keeps no table of compatible ops with {SHM_COMM_OP!r} in it "
            "(`deepspeed.ops.__compatible_ops__`, checked against 0.19): the shared-memory op cannot be skipped "
            "this way. Let one run build it (the first `init_distributed`), and after a build was killed delete the "
            f"`lock` left in ~/.cache/torch_extensions/*/{SHM_COMM_OP}/."
        )
    compatible[SHM_COMM_OP] = False

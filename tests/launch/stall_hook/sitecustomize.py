"""Makes the rank whose PYTHONPATH starts here hang inside a collective, for test_launchers: once the file
$TEST_STALL_TRIGGER exists, the rank's next all-reduce on the process group named by $TEST_STALL_GROUP writes
$TEST_STALL_TRIGGER.stopped and SIGSTOPs the rank (alive, its sockets open: a hung peer, not a dead one).

TEST_STALL_GROUP: `deepspeed`, a group DeepSpeed created (its gradient all-reduce), or `default`, the default
group (the training loop's own all-reduces). A stop sent from outside lands in whichever collective the peer
happens to be in, so it cannot tell whether every group honours the timeout.
"""
import os

_trigger = os.environ.get("TEST_STALL_TRIGGER")
if _trigger:
    import signal

    import torch.distributed as dist

    _group_kind = os.environ["TEST_STALL_GROUP"]
    if _group_kind not in ("deepspeed", "default"):
        raise SystemExit(f"TEST_STALL_GROUP must be 'deepspeed' or 'default', not {_group_kind!r}")
    _all_reduce = dist.all_reduce

    def all_reduce(tensor, *args, **kwargs):
        group = kwargs.get("group", args[1] if len(args) > 1 else None)
        is_default = group is None or group is dist.GroupMember.WORLD
        if os.path.exists(_trigger) and is_default == (_group_kind == "default"):
            with open(f"{_trigger}.stopped", "w") as f:
                f.write(f"{os.getpid()}\n")
            os.kill(os.getpid(), signal.SIGSTOP)
        return _all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = all_reduce

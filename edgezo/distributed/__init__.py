"""MeZO across processes and machines on torch.distributed (gloo: TCP, CPU), exchanging seeds and scalars only.

A MeZO update is (seeds, projected gradients, lr): every rank regenerates z from the seed and applies the same
float32 update in the same order, so the replicas stay bit-identical without ever sending weights. Two modes:

  data       every rank uses the step's seeds and scores its contiguous shard of the step's batch; the ranks
             all-gather their loss sums (L+, L- per direction: 16 bytes) and each adds them in rank order, an
             all-reduce whose summation order is fixed, so every rank computes the same projected gradient of the
             whole batch. It equals one worker's up to float64 summation order and llama.cpp's batch-composition
             effects (each rank decodes a batch of batch_size / W).
  direction  every rank scores the whole step's batch along its own direction(s) k = rank * n + j; the ranks
             all-gather (seed, L+, L-) (24 bytes per direction) and every rank applies all W * n updates in the
             order of k: bit-identical to one worker with --n-directions W * n (same batch, same seeds).

ConMeZO (--estimator conmezo) works in both modes: its momentum is a function of the applied updates, so it is the
same on every rank, and with it the cone the directions are drawn in; it is replayed and compared with the adapter.
Start: a new run builds the adapter from the seed on every rank; on --resume every rank loads the checkpoint if
its --out holds one of this run. A handshake compares digests of the configuration, the training data and the
adapter; a rank that is behind (another machine, an older copy, or none: the seed init is step 0) catches up by
replaying the step log that rank 0 sends (lr, seeds, projected gradients per step), again without weights.
A dead rank: gloo raises at the next exchange (a closed connection at once, a hung peer after --peer-timeout);
rank 0 saves a checkpoint at the last completed step and every survivor exits with code 130, like an interrupt.
Only rank 0 writes the run directory. Payload bytes are counted per phase as the nbytes of the tensors a rank
hands to gloo (its own contribution; with gloo's ring all-gather each rank also forwards W - 2 peers' payloads).
"""

from .catchup import (  # noqa: F401 (re-exported: `from edgezo.distributed import X`)
    COLLECTIVE_SCHEDULE, ReplicaRun, adapter_sha256, local_state, read_step_log, replay, run_digest)
from .group import (  # noqa: F401
    MODES, PHASES, STARTUP_TIMEOUT_S, Collective, DistConfig, Group, PeerLost, launched)
from .launch import launch_local  # noqa: F401
from .steppers import group_stepper  # noqa: F401

"""Named fault points for the fault-injection tests: where a run may be killed on purpose.

`point("name")` does nothing unless the environment variable BERT_JAX_FAULT names it:

  BERT_JAX_FAULT=checkpoint.before_commit        SIGKILL at the first time the point is reached
  BERT_JAX_FAULT=checkpoint.before_commit@3      ... at the third time
  BERT_JAX_FAULT=checkpoint.write@2:enospc       raise OSError(ENOSPC) there instead (a full
                                                 disk where no small file system can be mounted)

The process kills itself with SIGKILL (no cleanup, no finally blocks, no atexit), which is what a
preempted or OOM-killed host does. The variable is read at every call (cheap: one dict lookup), so
a test sets it for one subprocess only.
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "BERT_JAX_FAULT"
_hits: dict[str, int] = {}


def point(name: str) -> None:
  """Kills this process with SIGKILL if BERT_JAX_FAULT says `name` (at its N-th hit), or raises
  OSError(ENOSPC) there when the spec ends with ':enospc'."""
  spec = os.environ.get(ENV)
  if not spec:
    return
  spec, _, action = spec.partition(":")
  target, _, nth = spec.partition("@")
  if target != name:
    return
  _hits[name] = _hits.get(name, 0) + 1
  if _hits[name] != int(nth or 1):
    return
  if action == "enospc":
    raise OSError(errno.ENOSPC, f"No space left on device (injected at {name})")
  os.kill(os.getpid(), signal.SIGKILL)

"""Where hvdlm keeps what it builds once and reuses: the set-up's Horovod wheels and sources, the corpora.

The same rule as hvdlm/install/setup.sh: $HVDLM_CACHE, else $XDG_CACHE_HOME/hvdlm, else ~/.cache/hvdlm.
"""

import os
from pathlib import Path


def cache_root() -> Path:
    if os.environ.get("HVDLM_CACHE"):
        return Path(os.environ["HVDLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hvdlm"

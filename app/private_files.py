"""Files only their owner may read (the generated secret key, the first admin's password)."""

import os
import secrets
from pathlib import Path


def write_private_file(path: Path, content: str, *, replace: bool) -> bool:
    """Write content to path with mode 0600 from the first byte, so the file is never
    readable by others nor seen half-written. With replace=False an existing file
    is kept (another process got there first) and False is returned."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written under a unique name, then linked or renamed into place: whoever
    # reads path reads a whole file, even while another replica starts.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)  # fails if path exists: the first writer wins
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)

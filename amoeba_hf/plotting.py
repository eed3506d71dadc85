"""The matplotlib setup every plot of the package shares: no display needed, one row of panels, an atomic PNG."""

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def png_figure(path: str | os.PathLike, panels: int = 1, size: tuple[float, float] = (6, 4)) -> Iterator[tuple]:
    """Yield (figure, axes) with `panels` axes in a row; when the block ends, lay out and save a PNG at `path`.

    The Agg backend draws without a display (servers, CI). The PNG is written to a temporary sibling and renamed,
    so readers never see half a file; if the block fails, nothing is written. The figure is always closed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, panels, figsize=size, squeeze=False)
    try:
        yield figure, list(axes[0])
        figure.tight_layout()
        _save_atomically(figure, Path(path))
    finally:
        plt.close(figure)


def _save_atomically(figure, path: Path) -> None:
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        with os.fdopen(handle, "wb") as file:
            figure.savefig(file, format="png", dpi=120)
        os.chmod(staging, 0o666 & ~umask)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise

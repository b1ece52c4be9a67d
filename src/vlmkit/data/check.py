"""`vlmkit data check`: read every row and decode every image of a dataset, and name what is bad."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from vlmkit.data.bad_samples import BadSampleError
from vlmkit.data.formats.interleaved import is_interleaved_file, iter_interleaved
from vlmkit.data.formats.llava import DatasetFormatError, NotRowsError, iter_llava
from vlmkit.data.images import DEFAULT_MAX_PIXELS, load_image


@dataclass
class CheckReport:
    """What `check_dataset` found. ``bad`` holds ``(row_id, where, "reason: detail")``."""

    files: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)  # JSON files that are not row lists
    n_rows: int = 0
    n_images: int = 0  # distinct image files decoded
    bad: list[tuple[str, str, str]] = field(default_factory=list)

    def reasons(self) -> Counter:
        return Counter(reason.split(":")[0] for _, _, reason in self.bad)

    def summary(self) -> str:
        head = f"{len(self.files)} file(s), {self.n_rows} rows, {self.n_images} images checked"
        if self.skipped_files:
            head += f" ({len(self.skipped_files)} non-dataset JSON file(s) skipped)"
        if not self.bad:
            return f"{head}: all good"
        parts = ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons().items()))
        return f"{head}: {len(self.bad)} bad ({parts})"


def _dataset_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".json", ".jsonl"))
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"{path}: no such file or directory")


def check_dataset(path: str | Path, max_pixels: int | None = None) -> CheckReport:
    """Check a LLaVA JSON/JSONL file, or every ``*.json``/``*.jsonl`` directly in a directory.

    Image paths are resolved against each file's folder. Each distinct image file is decoded once;
    every row that uses a bad image is reported.
    """
    limit = max_pixels or DEFAULT_MAX_PIXELS
    report = CheckReport()
    path = Path(path)
    for file in _dataset_files(path):
        root = file.parent
        cache: dict[tuple, str | None] = {}
        try:
            rows = list(iter_interleaved(file) if is_interleaved_file(file) else iter_llava(file))
        except DatasetFormatError as err:
            if isinstance(err, NotRowsError) and path.is_dir():  # e.g. world.json beside the data
                report.skipped_files.append(str(file))
                continue
            report.files.append(str(file))
            report.bad.append(("-", str(file), f"malformed_file: {err}"))
            continue
        report.files.append(str(file))
        for row_id, where, item in rows:
            report.n_rows += 1
            if isinstance(item, BadSampleError):
                report.bad.append((row_id, where, str(item)))
                continue
            for ref in item.images:
                key = (ref.path, ref.url, ref.data)
                if key not in cache:
                    try:
                        load_image(ref, root, max_pixels=limit)
                        cache[key] = None
                    except BadSampleError as err:
                        cache[key] = str(err)
                    report.n_images += 1
                if cache[key] is not None:
                    report.bad.append((row_id, where, cache[key]))  # type: ignore[arg-type]
                    break
    return report

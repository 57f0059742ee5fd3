"""quip-sharp's packed E8P checkpoints (the published QuIP# models).

`packing`: the official bit layout as pure array functions (`pack_qidxs`, `unpack_qidxs`,
`reference_decode`, `to_quantized_linear`, `from_quantized_linear`); `folder`: official
Hugging Face folders in and out of quipjax checkpoints (`import_folder`,
`export_checkpoint`). Both are re-exported here.
"""
from quipjax.formats.quipsharp.folder import *  # noqa: F401,F403
from quipjax.formats.quipsharp.folder import __all__ as _folder_all
from quipjax.formats.quipsharp.packing import *  # noqa: F401,F403
from quipjax.formats.quipsharp.packing import __all__ as _packing_all

__all__ = list(_packing_all) + list(_folder_all)

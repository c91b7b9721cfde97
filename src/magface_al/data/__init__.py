"""Face data: RecordIO framing, face datasets, the folder packer and verification benchmark files.

Import from the modules (``magface_al.data.faces``, ``magface_al.data.recordio``,
...); this package imports nothing so that light commands stay fast.
"""

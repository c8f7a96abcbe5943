"""What the HTTP service needs beyond the inference API, in plain functions testable without a
server: its settings (:mod:`.settings`), image decoding with every limit (:mod:`.images`), the
response formats (:mod:`.render`), the ASGI guards (:mod:`.guards`) and the crop runner that
forwards to the batching model process (:mod:`.remote`).

Light on purpose, like :mod:`recyclelora.deploy`: numpy, OpenCV and Pillow only.
"""

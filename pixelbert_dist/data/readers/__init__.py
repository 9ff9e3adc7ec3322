"""Which samples a rank reads and in what order: the indexed reader and its epoch plan
(``indexed``, ``plan``), the streaming reader and its helpers (``stream*``), and DALI's own
webdataset reader (``dali_wds``)."""

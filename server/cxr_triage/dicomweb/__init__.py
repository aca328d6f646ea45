"""DICOMweb (PS3.18): the STOW-RS receiver, and later the WADO/QIDO client and the SR writer."""

"""Small data files shipped with the package (``general_text.txt``: generic retention contexts)."""

"""Models: the catalog of names a config may use, and this node's memory capacity. Downloads and the
fit check belong here too."""

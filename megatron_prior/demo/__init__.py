"""The embedded demo: a synthetic grounded image-caption benchmark (rendered offline from a
seed) on which PRIOR and NTP are trained and compared."""

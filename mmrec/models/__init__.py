"""Neural modules: item fusion (``fusion``) and user encoders (``user_encoders``).

Kept import-free so that ``import mmrec.models`` does not pull in torch; import the submodules.
"""

"""The weights stage: two checkpoints compared tensor by tensor (what changed, what still writes or reads r), and
`audit static`, which judges that evidence with checks/.
"""

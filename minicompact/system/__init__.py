"""What the operating system gives, made safe: the lowest floor, importing nothing of ours.

* ``atomic.py``     write a file so that a crash leaves the old one or the new one, whole
* ``processes.py``  child processes that never outlive their parent; is a pid alive
* ``npz.py``        the ``.npz`` reader and writer, what a saved array must be, ``CheckpointError``

Nothing here is imported by ``import minicompact.system``; import the module you need.
"""

"""`make bench`: vitcls's speed against its own ceilings and other libraries, one module each."""

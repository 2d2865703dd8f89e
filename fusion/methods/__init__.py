"""Training methods as lists of stages: `registry` names them, one file per method (`clm`, `fusellm`)."""

"""The papers' studies, reproduced on top of the library: DAE-Syn, Res-Dom, T5-GLUE, SQuAD, MOESART's benchmarks and
the MoEBERT task runs. The recipes in `recipes/` are their command lines. Nothing in the library imports this."""

"""Serving: the OpenAI gateway, llama.cpp command lines and binaries, the process specs the election
hands the supervisor, and the rpc-server tensor cache."""

//! Integration tests: the real daemon pieces on 127.0.0.1:0 and Unix sockets, real pipes.
mod pipe_program;

"""Native (C++) kernels: ``flash_attention`` is the CPU flash attention behind attention_impl='cpu_flash'."""

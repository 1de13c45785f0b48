#!/usr/bin/env python3
# Folded heaptrack stacks (heaptrack_print -F, any cost type) summed by their innermost
# non-allocator frames, per connection: heaptrack-fold.py FILE CONNECTIONS [DEPTH]
import sys, re, collections
# usage: fold.py FILE N [depth]
f, n = sys.argv[1], int(sys.argv[2]); depth = int(sys.argv[3]) if len(sys.argv) > 3 else 8
skip = re.compile(r'^(alloc|realloc|malloc|calloc|_RNvNtNtNtCs\w*3std3sys5alloc|_RNvCs\w+___rdl|_RNvX\w*GlobalAlloc|alloc_impl|allocate|box_new|new<>|grow|finish_grow|reserve|try_reserve|with_capacity|do_reserve|exchange_malloc|__rust|_RNv\w*rust_alloc|__rdl)')
agg = collections.Counter(); tot = 0
for line in open(f):
    stack, _, cost = line.rstrip('\n').rpartition(' ')
    cost = int(cost)
    if cost == 0: continue
    tot += cost
    fr = [x for x in stack.split(';') if x]
    fr = [re.sub(r'_R\w*?(\d+)([a-z_]\w*?)(?=E|$|\s)', lambda m: m.group(0), x) for x in fr]
    inner = [x for x in reversed(fr) if not skip.match(x)]
    key = ' < '.join(x[:70] for x in inner[:depth])
    agg[key] += cost
print('total', tot, 'per conn', tot / n)
for k, v in agg.most_common(int(sys.argv[4]) if len(sys.argv) > 4 else 40):
    print(f"{v/n:8.{1 if len(sys.argv) > 4 else 0}f}  {k}")

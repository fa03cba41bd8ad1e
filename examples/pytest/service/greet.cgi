#!/bin/sh
# The service under test: a tiny HTTP endpoint (busybox httpd CGI) that greets a name given as ?name=...
# It refuses names that are not plain lowercase words, as a real service must validate its input.
name=$(printf '%s' "$QUERY_STRING" | sed -n 's/^name=\([a-z]*\)$/\1/p')
if [ -z "$name" ]; then
    printf 'Status: 400 Bad Request\r\nContent-Type: text/plain\r\n\r\nbad name\n'
    exit 0
fi
count_file=/var/greeter/count
mkdir -p /var/greeter
count=$(( $(cat "$count_file" 2>/dev/null || echo 0) + 1 ))
echo "$count" > "$count_file"
printf 'Content-Type: text/plain\r\n\r\nhello %s (#%s)\n' "$name" "$count"

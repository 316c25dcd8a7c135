// workload is the one program of the images the real-node tests run: the
// pod sandbox's process and the workloads' processes. It is built static
// (no libc), so an image holds it alone.
//
//	workload pause                      the sandbox: wait for a signal, reap children
//	workload serve <port>               a TCP server: answers each connection with "ok <hostname>\n"
//	workload connect <host:port>        one connection attempt, no retry; prints "ok <answer>" or the error, exits 1 on failure
//	workload probe <host:port> <ms>     one connection attempt every <ms> milliseconds, forever; prints "<unix ms> ok <answer>" or "<unix ms> error <error>" for each
//	workload svid <socket>              fetch this process's X.509-SVID over the Workload API; prints its SPIFFE ID
//	workload http <port> <name> <log>   an HTTP/1.1 and h2c server (see workload_http.go)
//	workload ws <url> <message>         a WebSocket client (see workload_http.go)
package main

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

func usage() {
	fmt.Fprintln(os.Stderr, "usage: workload pause | serve <port> | connect <host:port> | probe <host:port> <ms> | svid <socket> | http <port> <name> <log> | ws <url> <message>")
	os.Exit(2)
}

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	switch os.Args[1] {
	case "pause":
		pause()
	case "serve":
		if len(os.Args) != 3 {
			usage()
		}
		serve(os.Args[2])
	case "connect":
		if len(os.Args) != 3 {
			usage()
		}
		connect(os.Args[2])
	case "probe":
		if len(os.Args) != 4 {
			usage()
		}
		ms, err := strconv.Atoi(os.Args[3])
		if err != nil || ms <= 0 {
			usage()
		}
		probe(os.Args[2], time.Duration(ms)*time.Millisecond)
	case "svid":
		if len(os.Args) != 3 {
			usage()
		}
		svid(os.Args[2])
	case "http":
		if len(os.Args) != 5 {
			usage()
		}
		serveHTTP(os.Args[2], os.Args[3], os.Args[4])
	case "ws":
		if len(os.Args) != 4 {
			usage()
		}
		websocketClient(os.Args[2], os.Args[3])
	default:
		usage()
	}
}

// pause waits for SIGINT or SIGTERM; as PID 1 of a sandbox it also reaps
// the children the kernel gives it.
func pause() {
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range signals {
		if s != syscall.SIGCHLD {
			return
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}

func serve(port string) {
	listener, err := net.Listen("tcp", ":"+port)
	if err != nil {
		fmt.Fprintf(os.Stderr, "cannot listen on port %s: %v\n", port, err)
		os.Exit(1)
	}
	host, _ := os.Hostname()
	fmt.Printf("serving on %s\n", listener.Addr())
	for {
		conn, err := listener.Accept()
		if err != nil {
			continue
		}
		go func(c net.Conn) {
			defer c.Close()
			fmt.Fprintf(c, "ok %s\n", host)
		}(conn)
	}
}

func connect(addr string) {
	start := time.Now()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		fmt.Printf("error %v\n", err)
		os.Exit(1)
	}
	defer conn.Close()
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		fmt.Printf("error reading: %v\n", err)
		os.Exit(1)
	}
	fmt.Printf("%s in %d us\n", line[:len(line)-1], time.Since(start).Microseconds())
}

// probe makes one connection attempt per interval, each on its own (no
// retry), and prints each outcome with the time it started.
func probe(addr string, interval time.Duration) {
	for {
		start := time.Now()
		conn, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err != nil {
			fmt.Printf("%d error %v\n", start.UnixMilli(), err)
		} else {
			_ = conn.SetReadDeadline(time.Now().Add(2 * time.Second))
			line, err := bufio.NewReader(conn).ReadString('\n')
			conn.Close()
			if err != nil {
				fmt.Printf("%d error reading: %v\n", start.UnixMilli(), err)
			} else {
				fmt.Printf("%d %s\n", start.UnixMilli(), line[:len(line)-1])
			}
		}
		time.Sleep(interval)
	}
}

func svid(socket string) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	got, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr("unix://"+socket))
	if err != nil {
		fmt.Printf("error %v\n", err)
		os.Exit(1)
	}
	fmt.Println(got.ID.String())
}
